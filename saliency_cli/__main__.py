from saliency_cli.cli import main

main()
