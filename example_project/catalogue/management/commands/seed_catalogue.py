"""Fill the catalogue with a deterministic set of products, so every demo run looks the same."""

import os
import random
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.utils.text import slugify

from catalogue.keys import ALL_TAG
from catalogue.models import Category, Product
from django_distcache import invalidate_model, invalidate_tags

CATEGORIES = [
    ("Teapots", "Teapot"),
    ("Mugs", "Mug"),
    ("Kettles", "Kettle"),
    ("Grinders", "Grinder"),
    ("Scales", "Scale"),
    ("Filters", "Filter"),
    ("Tins", "Tin"),
    ("Trays", "Tray"),
]
ADJECTIVES = ["Classic", "Compact", "Rustic", "Modern", "Nordic", "Vintage", "Slim", "Grand", "Tiny", "Bold"]
MATERIALS = ["Oak", "Copper", "Steel", "Clay", "Glass", "Walnut", "Bamboo", "Brass", "Porcelain", "Slate"]


def product_name(index: int) -> str:
    """Names cycle through category, adjective and material; past 800 a series number keeps them unique."""
    _, noun = CATEGORIES[index % len(CATEGORIES)]
    step = index // len(CATEGORIES)
    adjective = ADJECTIVES[step % len(ADJECTIVES)]
    material = MATERIALS[step // len(ADJECTIVES) % len(MATERIALS)]
    series = step // (len(ADJECTIVES) * len(MATERIALS))
    return f"{adjective} {material} {noun}" + (f" {series + 1}" if series else "")


class Command(BaseCommand):
    help = "Seed the catalogue with deterministic demo data (does nothing if products exist, unless --reset)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--products", type=int, default=200, help="How many products (default 200).")
        parser.add_argument("--reset", action="store_true", help="Delete the existing catalogue first.")

    def handle(self, *args: Any, products: int, reset: bool, **options: Any) -> None:
        self.ensure_superuser()
        if Product.objects.exists() and not reset:
            self.stdout.write("Catalogue already has products; leaving it alone (use --reset to rebuild).")
            return
        with transaction.atomic():
            if reset:
                Category.objects.all().delete()
            self.seed(products)
        self.stdout.write(self.style.SUCCESS(f"Seeded {products} products in {len(CATEGORIES)} categories."))

    def seed(self, count: int) -> None:
        """bulk_create sends no signals, so invalidate the whole catalogue here, pages and cached rows: a
        rebuilt database may meet an old cache, whose entries name rows by primary keys or slugs that now
        belong to other rows (or say a slug has no row). Both run when the transaction commits."""
        rng = random.Random(2024)
        categories = Category.objects.bulk_create(
            Category(name=name, slug=slugify(name)) for name, _ in CATEGORIES
        )
        rows = []
        for index in range(count):
            name = product_name(index)
            category = categories[index % len(categories)]
            rows.append(
                Product(
                    category=category,
                    name=name,
                    slug=slugify(name),
                    description=f"A {name.lower()} from our {category.name.lower()} range.",
                    price=Decimal(rng.randrange(400, 25000)) / 100,
                    stock=rng.choice([0, rng.randrange(1, 120)]),
                )
            )
        Product.objects.bulk_create(rows, batch_size=500)
        invalidate_model(Category)
        invalidate_model(Product)
        transaction.on_commit(lambda: invalidate_tags(ALL_TAG))

    def ensure_superuser(self) -> None:
        """With DISTCACHE_DEMO_SUPERUSER=1, make admin/admin so the demo's admin link works."""
        User = get_user_model()
        wanted = os.environ.get("DISTCACHE_DEMO_SUPERUSER") == "1"
        if not wanted or User.objects.filter(username="admin").exists():
            return
        User.objects.create_superuser("admin", "admin@example.com", "admin")
        self.stdout.write(self.style.WARNING("Created superuser admin/admin (demo only)."))
