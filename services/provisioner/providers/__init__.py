"""Node providers: one interface (:class:`~services.provisioner.providers.base.Provider`), chosen per
installation by ``KAITEN_PROVIDER``."""
