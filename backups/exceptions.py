class BackupError(Exception):
    """A backup or restore that was refused or failed; the message says why and what to do."""
