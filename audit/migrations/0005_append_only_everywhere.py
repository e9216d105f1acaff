"""The database refuses to empty or change the audit table, on SQLite too.

PostgreSQL: 0002's row trigger stops UPDATE and DELETE; TRUNCATE fires no row trigger, so a
statement trigger stops it. The trigger is only as strong as the role split around it: whoever owns
the table can drop or disable it, so the application must connect as a role that does not own the
table (docs/audit.md).

An empty table may be truncated: nothing is lost, and Django's flush (the test suite's teardown of
transactional tests) truncates every table in one statement once the audit rows are gone.

SQLite: no roles and no TRUNCATE (DELETE FROM is a DELETE), so two row triggers guard development
databases against mistakes. A later migration that rebuilds this table on SQLite drops them;
verify_audit reports missing triggers.
"""

from django.db import migrations

POSTGRESQL_CREATE = """
CREATE OR REPLACE FUNCTION audit_event_no_truncate() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM audit_auditevent) THEN
        RAISE EXCEPTION USING MESSAGE = 'audit_auditevent is append-only: TRUNCATE is not allowed';
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_event_no_truncate
    BEFORE TRUNCATE ON audit_auditevent
    FOR EACH STATEMENT EXECUTE FUNCTION audit_event_no_truncate();
"""
POSTGRESQL_DROP = """
DROP TRIGGER IF EXISTS audit_event_no_truncate ON audit_auditevent;
DROP FUNCTION IF EXISTS audit_event_no_truncate();
"""
# One statement each: SQLite's driver runs one statement per call.
SQLITE_CREATE = [
    """
    CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_auditevent
    BEGIN SELECT RAISE(ABORT, 'audit_auditevent is append-only: UPDATE is not allowed'); END
    """,
    """
    CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_auditevent
    BEGIN SELECT RAISE(ABORT, 'audit_auditevent is append-only: DELETE is not allowed'); END
    """,
]
SQLITE_DROP = ["DROP TRIGGER IF EXISTS audit_event_no_update", "DROP TRIGGER IF EXISTS audit_event_no_delete"]


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(POSTGRESQL_CREATE)
    elif schema_editor.connection.vendor == "sqlite":
        for statement in SQLITE_CREATE:
            schema_editor.execute(statement)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(POSTGRESQL_DROP)
    elif schema_editor.connection.vendor == "sqlite":
        for statement in SQLITE_DROP:
            schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("audit", "0004_keyed_chain_start")]
    operations = [migrations.RunPython(forwards, backwards)]
