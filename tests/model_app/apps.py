from django.apps import AppConfig


class ModelAppConfig(AppConfig):
    name = "tests.model_app"
    label = "model_app"

    def ready(self) -> None:
        # Registration without the decorator, as for a model of an app the user does not own.
        import django_distcache

        from .models import Label

        django_distcache.cache_model(Label, lookups=("pk", "name"), timeout=300)
