"""The djangoapp workload: a Django site with an ORM model, sympy and botocore, as Debian packages them.

Its start reads very many small files: about 3,000 (27 kB on average) of the image's 18,000 (Django's
and botocore's data, sympy's modules and their byte-compiled twins). It configures Django with the
contrib apps, makes the tables in an in-memory SQLite database, resolves a URL, renders a template,
simplifies an expression with sympy and builds an S3 client offline, then prints its ready line.
"""

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF="urls",
    INSTALLED_APPS=[
        "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
        "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles",
    ],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
    ],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
                "OPTIONS": {"context_processors": ["django.contrib.auth.context_processors.auth",
                                                   "django.contrib.messages.context_processors.messages",
                                                   "django.template.context_processors.request"]}}],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    USE_I18N=True,
    LANGUAGE_CODE="de",
    STATIC_URL="/static/",
)
django.setup()

import botocore.session  # noqa: E402  (after django.setup(), as a Django project imports it)
import sympy  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.template.loader import render_to_string  # noqa: E402
from django.test import RequestFactory  # noqa: E402
from django.urls import reverse  # noqa: E402

call_command("migrate", verbosity=0)
page = render_to_string("admin/login.html", {"site_header": "bench"}, request=RequestFactory().get("/"))
x = sympy.Symbol("x")
expr = sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
s3 = botocore.session.get_session().create_client("s3", region_name="eu-west-1", aws_access_key_id="a",
                                                  aws_secret_access_key="b")
print("ready", django.get_version(), reverse("admin:index"), len(page), expr, s3.meta.region_name, flush=True)
