"""Warning filters of every command-line process (launch.py, its spawned ranks, the tools)."""


def quiet_warnings() -> None:
    import warnings

    # megatron-core warns at import that TE/apex are absent: expected on CPU, noise for users.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)
