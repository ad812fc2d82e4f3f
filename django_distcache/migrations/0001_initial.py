from typing import ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies: ClassVar[list[tuple[str, str]]] = []

    operations = [
        migrations.CreateModel(
            name="BehindApplied",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("model", models.CharField(max_length=100)),
                ("pk_value", models.CharField(max_length=255)),
                ("stream_id", models.CharField(max_length=41)),
            ],
            options={"db_table": "django_distcache_behindapplied"},
        ),
        migrations.AddConstraint(
            model_name="behindapplied",
            constraint=models.UniqueConstraint(fields=("model", "pk_value"), name="distcache_behind_row"),
        ),
    ]
