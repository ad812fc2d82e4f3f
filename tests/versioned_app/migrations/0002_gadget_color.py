from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("versioned_app", "0001_initial")]
    operations = [
        migrations.AddField(
            model_name="gadget", name="color", field=models.CharField(default="black", max_length=20)
        ),
    ]
