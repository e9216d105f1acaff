from django.core.management.base import BaseCommand, CommandError

from backups.services import BackupError, backup_restore


class Command(BaseCommand):
    help = (
        "Restore a backup made by `backup` into the configured database and media storage, which must both be "
        "empty (a new database: createdb, without migrate), then verify it: verify_audit against the backup's "
        "audit anchor, every stored image against its row's SHA-256, the row count of every table against the "
        "manifest, the model files. Refuses a damaged, changed or incomplete backup (every file's SHA-256 is "
        "checked first) and writes nothing then. Needs the same AUDIT_HMAC_KEY and FIELD_ENCRYPTION_KEY as the "
        "platform that made the backup. Exits non-zero on any mismatch. See docs/backup.md."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", metavar="DIR", help="the backup folder (with manifest.json)")
        parser.add_argument(
            "--allow-missing",
            action="store_true",
            help="accept the stored files and model versions that the backup's manifest lists as missing when it "
            "was taken (backup --allow-missing); any other mismatch still fails",
        )
        parser.add_argument(
            "--manifest-sha256",
            metavar="HEX",
            help="the manifest's SHA-256 as `backup` printed it, kept apart from the backup: refuse a backup whose "
            "manifest (and with it any file) was rewritten",
        )
        parser.add_argument(
            "--previous-key-file",
            metavar="FILE",
            action="append",
            default=[],
            help="an audit key retired by a rotation, for the events it made (passed to verify_audit; repeatable)",
        )
        parser.add_argument("--quiet", action="store_true", help="print nothing unless it fails")

    def handle(self, *args, directory: str, allow_missing: bool, previous_key_file: list[str], quiet: bool, **options):
        manifest_sha256 = options["manifest_sha256"]
        say = (lambda line: None) if quiet else self.stdout.write
        try:
            report = backup_restore(
                directory=directory,
                allow_missing=allow_missing,
                manifest_sha256=manifest_sha256,
                previous_key_files=previous_key_file,
                progress=say,
            )
        except BackupError as error:
            raise CommandError(f"restore failed: {error}") from None
        if report.failures:
            self.stderr.write("\n".join(report.lines))
            raise CommandError(
                f"restored, but {len(report.failures)} check(s) failed (above): do not put this copy into service"
            )
        say("\n".join(report.lines))
        say("restore complete and verified")
