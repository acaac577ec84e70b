"""Serving: `hsnet-deploy serve` (HTTP on Ray Serve) and `hsnet-deploy triton-repo` (a Triton model repository).

Ray is an optional extra (`pip install -e ".[serve]"`): only `app` and `launch` import it, and only when the
`serve` command runs, so `import hsnet_deploy` works without it.
"""
