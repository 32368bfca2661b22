package peers

// WithCRILocalPull makes CRI pull with its own client-side pull (containerd's
// `use_local_image_pull`) instead of the transfer service: the second of containerd 2.x's
// two pull paths, which reads registry hosts from CRI's config_path too.
func WithCRILocalPull() ContainerdOption { return withLocalImagePull() }
