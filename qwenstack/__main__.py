from qwenstack.cli import main

main()
