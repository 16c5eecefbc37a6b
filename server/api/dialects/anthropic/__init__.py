"""Anthropic's Messages API: routes.py (the routes), convert.py (request -> our chat
request), reply.py (our reply -> Message or events), errors.py (its error shape)."""
