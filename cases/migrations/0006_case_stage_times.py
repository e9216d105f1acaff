# Add -> fill (0007) -> alter (0008): when each case entered its status and last became ready for review.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("cases", "0005_patch_failure_code"),
    ]

    operations = [
        migrations.AddField(
            model_name="biopsycase",
            name="ready_for_review_at",
            field=models.DateTimeField(
                blank=True,
                editable=False,
                help_text="When the case last became ready for review (every patch had a result); empty: never yet.",
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="biopsycase",
            name="status_changed_at",
            field=models.DateTimeField(
                editable=False, help_text="When the case entered its current status.", null=True
            ),
        ),
    ]
