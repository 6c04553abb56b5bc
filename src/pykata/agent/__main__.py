from pykata.agent.main import main

main()
