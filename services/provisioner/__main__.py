from services.provisioner.main import main

main()
