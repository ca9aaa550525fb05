"""Transport security and identity: TLS material and credentials (``tls``, ``localca``) and, on
the identity side, principals, authenticators and pool-signed tickets."""
