"""The site data layer: discovery and validation of a site folder, transforms, datasets."""
