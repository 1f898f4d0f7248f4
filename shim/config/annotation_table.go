package config

// AnnotationDisk is the family of disk-image annotations, podvm.io/disk.<volume>=<size>
// (rootfs.DiskAnnotationPrefix reads them).
const AnnotationDisk = AnnotationPrefix + "disk."

// AnnotationInfo documents one podvm.io pod annotation (or a family of them). The annotation
// reference, docs/reference/annotations.md, is generated from KnownAnnotations.
type AnnotationInfo struct {
	// Key is the full annotation key; a family names its variable part in angle brackets
	// ("podvm.io/disk.<volume>").
	Key string
	// Allow is the annotations.allowed entry that lets pods set it.
	Allow string
	// Value says what the value is and which values are accepted.
	Value string
	// Example is a value as a pod sets it.
	Example string
	// Doc says what the annotation does.
	Doc string
}

// KnownAnnotations lists every podvm.io annotation the shim reads, in the order the
// reference shows them. None is honoured unless annotations.allowed lists it.
func KnownAnnotations() []AnnotationInfo {
	return []AnnotationInfo{
		{
			Key: AnnotationVCPUs, Allow: "vcpus", Example: "2",
			Value: "a whole number, 1 to sandbox.max_vcpus",
			Doc: "The pod VM's vCPU count. Without it (or when not allowed) the VM gets the pod's CPU limit " +
				"rounded up, else sandbox.default_vcpus.",
		},
		{
			Key: AnnotationMemory, Allow: "memory", Example: "1Gi",
			Value: "a Kubernetes quantity, 128Mi to sandbox.max_memory",
			Doc: "The pod VM's guest RAM, used as is. Without it (or when not allowed) the VM gets " +
				"sandbox.default_memory plus the sum of the containers' memory limits.",
		},
		{
			Key: AnnotationDisk + "<volume>", Allow: "disk.*", Example: "10Gi",
			Value: "a size, at least 16Mi and at most block.max_disk_size",
			Doc: "Turns the pod's filesystem volume <volume> (one in the pod's own directory on the node, such as an " +
				"emptyDir) into a " +
				"disk image: <volume dir>/disk.img, created sparse and formatted ext4 when missing, " +
				"hot-plugged as a virtio-blk disk and mounted in the guest where the volume was. Faster " +
				"than virtio-fs for many small files; the image keeps the volume's data.",
		},
	}
}
