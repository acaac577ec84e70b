"""`python -m hsnet_deploy` is the same command as `hsnet-deploy` (the GPU machine runs from source)."""

from hsnet_deploy.cli import main

if __name__ == "__main__":
    main()
