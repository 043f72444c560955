"""Numba kernels behind gradclip (installed as ``gradclip._kernels``).

``cpu`` holds the ``@njit`` kernels, ``private_cpu`` those of private training
(imported on first use). Nothing here is compiled at import time:
every kernel compiles on its first call and is cached on disk.
"""
