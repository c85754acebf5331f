The built-in registry's images can be listed, inspected and deleted over WAMP:
`zwrm.image.list`, `zwrm.image.info`, `zwrm.image.delete` (docs/images.md).
