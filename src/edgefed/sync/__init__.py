"""The federation store and its protocol: layout, backends, signatures, verification."""
