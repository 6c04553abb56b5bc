from pykata.agent import boot_profile

boot_profile.mark("agent_started")

from pykata.agent.main import main  # noqa: E402 - after the mark: the imports are measured

main()
