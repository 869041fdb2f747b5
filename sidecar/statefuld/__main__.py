from statefuld.cli import main

main()
