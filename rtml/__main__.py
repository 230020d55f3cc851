from rtml.cli import main

main()
