from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from audit.anchors import anchor_check, anchor_parse
from audit.models import AuditEvent
from audit.services import audit_protection_missing, audit_verify


class Command(BaseCommand):
    help = (
        "Walk the audit trail's hash chains (one per institution, one for the platform, and the global "
        "chain of the events from before them) from their first events. Exits non-zero, naming the first "
        "event that does not verify, when any event was altered, removed, inserted out of order or moved "
        "to another chain, or when a chain was rewritten without the audit key (AUDIT_HMAC_KEY). A chain "
        "alone cannot show that events were cut from its end: give --anchor with an anchor kept outside "
        "the database (made by audit_anchor) to check that too, for every chain. Also exits non-zero when "
        "the database's append-only triggers are missing or disabled."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--anchor",
            metavar="FILE",
            help="an anchor file written by `audit_anchor --out`: each chain's anchored event must still exist, "
            "with its hash, and with as many events of its chain up to it as the anchor counted",
        )
        parser.add_argument(
            "--previous-key-file",
            metavar="FILE",
            action="append",
            default=[],
            help="a file holding an audit key that a rotation retired, for the events made with it (repeatable)",
        )

    def handle(self, *args, **options):
        anchor = self._anchor(options["anchor"]) if options["anchor"] else None
        previous_keys = tuple(self._key(name) for name in options["previous_key_file"])
        checked, bad, why = audit_verify(previous_keys=previous_keys)
        if bad is not None:
            when = f"{bad.created_at:%Y-%m-%d %H:%M:%S} UTC"
            raise CommandError(
                f"audit event #{bad.pk} ({bad.action}, {when}) does not verify: {why}; "
                f"the {checked} events before it verified"
            )
        missing = audit_protection_missing()
        if missing:
            raise CommandError(
                f"the {checked} audit events verify, but the database no longer refuses changes to them: "
                f"trigger {', '.join(missing)} missing or disabled (rerun the audit migrations; docs/audit.md)"
            )
        if anchor is not None:
            why = anchor_check(anchor)
            if why:
                raise CommandError(f"the audit trail does not match the anchor {options['anchor']}: {why}")
        unkeyed = AuditEvent.objects.filter(hash_scheme=AuditEvent.HashScheme.SHA256).count()
        message = f"OK: {checked} audit events verify"
        if unkeyed:
            message += f" ({unkeyed} from before keyed chaining, with plain SHA-256 hashes)"
        if anchor is not None:
            chains = len(anchor["chains"])
            message += (
                f"; the anchor (event #{anchor['id']}, {anchor['count']} events in {chains} "
                f"chain{'s' if chains != 1 else ''}) matches"
            )
        self.stdout.write(message)

    def _anchor(self, name: str) -> dict:
        try:
            return anchor_parse(_read(name, "anchor file"))
        except ValueError as error:
            raise CommandError(f"the anchor file {name} cannot be used: {error}") from None

    def _key(self, name: str) -> str:
        key = _read(name, "key file").strip()
        if not key:
            raise CommandError(f"the key file {name} is empty")
        return key


def _read(name: str, what: str) -> str:
    try:
        return Path(name).read_text()
    except OSError as error:
        raise CommandError(f"cannot read the {what} {name}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise CommandError(f"the {what} {name} is not text") from None
