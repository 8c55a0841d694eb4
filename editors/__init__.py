"""The model side of kmd: model host, hook utility, editor protocol, backends, benchmarks.

Importing this package is cheap: nothing here imports torch until a submodule is used.
"""
