from django.apps import AppConfig


class CatalogueConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "catalogue"

    def ready(self) -> None:
        """Connect the invalidation signals once the models are loaded."""
        from . import signals

        signals.connect()
