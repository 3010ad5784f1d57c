class RegistryTimeout(TimeoutError):
    """Waiting for records or a lock took longer than allowed."""
