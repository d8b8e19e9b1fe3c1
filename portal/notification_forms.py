"""The webhook page's form (Flask-WTF: every POST carries the session's CSRF token)."""

from __future__ import annotations

from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import BooleanField, SubmitField, URLField
from wtforms.validators import DataRequired, Length


class WebhookForm(FlaskForm):
    url = URLField(_l("Endpoint URL"), validators=[DataRequired(), Length(max=2000)],
                   description=_l("Events are POSTed here as signed JSON. Its host must "
                                  "resolve to public addresses."),
                   render_kw={"placeholder": "https://example.com/ensoul/webhooks",
                              "data-testid": "webhook-url"})
    enabled = BooleanField(_l("Send events"), default=True,
                           render_kw={"data-testid": "webhook-enabled"})
    submit = SubmitField(_l("Save endpoint"), render_kw={"data-testid": "webhook-submit"})
