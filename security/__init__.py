"""The security library: secrets (``security.secrets``). Other packages call it; it imports none of them."""
