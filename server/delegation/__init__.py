"""Agents acting for people: delegation policies and RFC 8693 token exchange.

* :mod:`server.delegation.policy` — parsing and matching of :class:`DelegationPolicy`
  fields (agent patterns, subject claims, scopes, budgets);
* :mod:`server.delegation.config` — ``[server.delegation]`` and its trusted subject issuers;
* :mod:`server.delegation.subjects` — verifying a person's token from one of those issuers;
* :mod:`server.delegation.exchange` — the token exchange itself, from the form fields to
  the RFC 8693 response or an RFC 6749 error (:mod:`server.delegation.errors`);
* :mod:`server.delegation.routes` — the token, introspection and metadata endpoints on the
  HTTP front end (thin: parse the request, call the exchange, render).
"""
