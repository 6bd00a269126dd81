from dino_ctl.cli.main import main

main()
