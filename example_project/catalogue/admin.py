from django.contrib import admin

from .models import Category, Product, ProductViews


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    search_fields = ["name"]


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["name", "category", "price", "stock", "views", "updated_at"]
    list_filter = ["category"]
    list_select_related = ["category", "page_views"]
    prepopulated_fields = {"slug": ["name"]}
    search_fields = ["name", "slug"]

    @admin.display(description="views (saved)")
    def views(self, product: Product) -> int:
        """The count in the database: it trails the page's count until the next write-behind drain."""
        try:
            return product.page_views.views
        except ProductViews.DoesNotExist:
            return 0
