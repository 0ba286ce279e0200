from services.tuning.job import main

main()
