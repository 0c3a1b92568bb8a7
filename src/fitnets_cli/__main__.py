from fitnets_cli.cli import main

main()
