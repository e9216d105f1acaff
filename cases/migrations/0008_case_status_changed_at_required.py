import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("cases", "0007_case_stage_times_fill"),
    ]

    operations = [
        migrations.AlterField(
            model_name="biopsycase",
            name="status_changed_at",
            field=models.DateTimeField(
                default=django.utils.timezone.now,
                editable=False,
                help_text="When the case entered its current status.",
            ),
        ),
    ]
