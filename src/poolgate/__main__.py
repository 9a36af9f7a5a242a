from poolgate.cli.main import main

main()
