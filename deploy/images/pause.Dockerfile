# The sandbox image of the test node (containerd's sandbox_image): one static binary, built from
# deploy/images/pause by kaiten.local.images into the build context, nothing else.
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
