import json

from django.core.management.base import BaseCommand, CommandError

from backups.services import BackupError, backup_create, problem_text


class Command(BaseCommand):
    help = (
        "Back the platform up into a new or empty folder: the database as one consistent snapshot "
        "(PostgreSQL: pg_dump --format=custom; SQLite: the online backup API), safe while the platform runs; "
        "every stored image that a row of that snapshot names, read through the storage API; the registered "
        "model versions' directories; an audit anchor read from the same snapshot; and manifest.json, written "
        "last, with every file's SHA-256. The folder holds patient data: store it encrypted and access-controlled. "
        "Restore with `restore DIR`; see docs/backup.md."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, metavar="DIR", help="the backup folder: must not exist or be empty")
        parser.add_argument(
            "--allow-missing",
            action="store_true",
            help="finish even when some rows' stored files (or model files) are missing or differ from their "
            "recorded SHA-256; they are listed in the manifest's 'problems'. Without it such a backup fails.",
        )
        parser.add_argument("--quiet", action="store_true", help="print nothing unless it fails")

    def handle(self, *args, out: str, allow_missing: bool, quiet: bool, **options):
        say = (lambda line: None) if quiet else self.stdout.write
        try:
            result = backup_create(out=out, allow_missing=allow_missing, progress=say)
        except BackupError as error:
            raise CommandError(f"backup failed: {error}") from None
        manifest = result.manifest
        for problem in result.problems:
            self.stderr.write(f"not backed up: {problem_text(problem)}")
        anchor = "no audit events"
        if manifest["audit_anchor"]:
            parsed = json.loads((result.directory / manifest["audit_anchor"]).read_text())
            anchor = f"event #{parsed['id']}, {parsed['count']} events in {len(parsed['chains'])} chain(s)"
        database = manifest["files"][manifest["database"]["file"]]["size"]
        say(
            f"backup complete: {result.directory}\n"
            f"  database: {manifest['database']['vendor']}, {database} bytes, "
            f"{sum(manifest['tables'].values())} rows in {len(manifest['tables'])} tables\n"
            f"  images: {manifest['stored_files']['copied']} of {manifest['stored_files']['count']} "
            f"({manifest['stored_files']['bytes']} bytes)\n"
            f"  model versions: {len(manifest['model_versions'])}\n"
            f"  audit anchor: {anchor}\n"
            f"  manifest.json SHA-256: {result.manifest_sha256} (keep it apart from the backup)"
        )
