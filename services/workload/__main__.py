from services.workload.main import main

main()
