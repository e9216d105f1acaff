"""Encrypt every endpoint's signing secret into ``secret_encrypted`` and blank the plaintext
column (dropped by the next migration). Reversible: the way back decrypts."""

from django.db import migrations


def encrypt_secrets(apps, schema_editor):
    from webhooks.crypto import secret_encrypt

    WebhookEndpoint = apps.get_model("webhooks", "WebhookEndpoint")
    for endpoint in WebhookEndpoint.objects.exclude(secret="").only("pk", "secret"):
        endpoint.secret_encrypted = secret_encrypt(endpoint.secret)
        endpoint.secret = ""
        endpoint.save(update_fields=["secret", "secret_encrypted"])


def decrypt_secrets(apps, schema_editor):
    from webhooks.crypto import secret_decrypt

    WebhookEndpoint = apps.get_model("webhooks", "WebhookEndpoint")
    for endpoint in WebhookEndpoint.objects.exclude(secret_encrypted="").only("pk", "secret_encrypted"):
        endpoint.secret = secret_decrypt(endpoint.secret_encrypted)
        endpoint.secret_encrypted = ""
        endpoint.save(update_fields=["secret", "secret_encrypted"])


class Migration(migrations.Migration):

    dependencies = [
        ("webhooks", "0002_delivery_claim_and_encrypted_secret"),
    ]

    operations = [
        migrations.RunPython(encrypt_secrets, decrypt_secrets, elidable=False),
    ]
