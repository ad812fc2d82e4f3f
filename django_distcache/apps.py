from django.apps import AppConfig


class DistcacheConfig(AppConfig):
    name = "django_distcache"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "django-distcache"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .dispatch import celery_installed

        if celery_installed():
            from . import tasks  # noqa: F401  (registers the tasks, which features queue by name)
