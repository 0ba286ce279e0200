from services.watcher.main import main

main()
