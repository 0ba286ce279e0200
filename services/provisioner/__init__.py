"""Provisioner: GPU nodes from AKS, Karpenter NodeClaims, BYO nodes or the local machine (issue 6).

Not built yet: this package only reserves its place in the layout.
"""
