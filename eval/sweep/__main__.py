from eval.sweep.cli import main

main()
