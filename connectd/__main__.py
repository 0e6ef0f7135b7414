from connectd.cli import main

main()
