"""Outgoing e-mail through the configured SMTP server.

Without ``ENSOUL_SMTP_HOST`` (the embedded default) mails are written to the log instead, so a
first run can follow an invitation or reset link without a mail server.
"""

from __future__ import annotations

import logging
import smtplib
from email.message import EmailMessage

from flask import current_app

log = logging.getLogger(__name__)


def send_mail(to: str, subject: str, body: str) -> None:
    config = current_app.config
    message = EmailMessage()
    message["From"] = config["ENSOUL_MAIL_FROM"]
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    host = config["ENSOUL_SMTP_HOST"]
    if not host:
        log.info("mail (no SMTP configured) to=%s subject=%s\n%s", to, subject, body)
        return
    try:
        with smtplib.SMTP(host, int(config["ENSOUL_SMTP_PORT"]), timeout=10) as smtp:
            if config["ENSOUL_SMTP_STARTTLS"]:
                smtp.starttls()
            if config["ENSOUL_SMTP_USER"]:
                smtp.login(config["ENSOUL_SMTP_USER"], config["ENSOUL_SMTP_PASSWORD"] or "")
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException):
        log.exception("sending mail to %s failed", to)
