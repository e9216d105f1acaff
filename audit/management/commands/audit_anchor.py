import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from audit.anchors import audit_anchor


class Command(BaseCommand):
    help = (
        "Print the audit trail's anchor as one line of JSON: for each hash chain (each institution's, the "
        "platform's, the global one from before them) its latest event's id and hash, the number of its "
        "events up to it, its time and the key fingerprint. Keep it outside the database (a log shipped "
        "elsewhere, another system, paper): `verify_audit --anchor FILE` then proves that no event up to "
        "them was changed or removed, including from the end of any chain, which a chain alone cannot show."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", metavar="FILE", help="also write the anchor to FILE (replacing it)")

    def handle(self, *args, **options):
        anchor = audit_anchor()
        if anchor is None:
            self.stdout.write("no audit events yet: nothing to anchor")
            return
        line = json.dumps(anchor, sort_keys=True)
        if options["out"]:
            try:
                Path(options["out"]).write_text(line + "\n")
            except OSError as error:
                raise CommandError(f"cannot write the anchor to {options['out']}: {error.strerror}") from None
        self.stdout.write(line)
