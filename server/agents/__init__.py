"""How the server serves node agents, one module per flow (the gRPC edge is server.api.agent).

* :mod:`server.agents.attestation`: node attestation rules (rate, attestor, bans,
  re-attestation, node-alias entries, the first agent SVID);
* :mod:`server.agents.authn`: who is calling (the agent SVID, checked on every call), agent
  SVID renewal and serial rotation, the signing-call rate;
* :mod:`server.agents.sync`: which entries each agent is authorized for (memoised), and its
  ``SyncEntries`` stream;
* :mod:`server.agents.errors`: why the server refuses an agent (each error carries the
  ``credo-refusal`` code of :mod:`credo._protocol`).

Workload SVID issuance for agents is :mod:`server.issuance`.
"""
