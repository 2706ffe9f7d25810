from mnist_tune.cli import main

main()
