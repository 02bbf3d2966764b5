package loop

import "os"

// BindingOf returns the binding of the loop device open on f, whoever bound
// it: ErrNotBound if nothing is bound to it. f must be a loop device; f stays
// the caller's.
func BindingOf(f *os.File) (Binding, error) {
	b, err := readBinding(int(f.Fd()), f.Name())
	if err != nil {
		return Binding{}, &OpError{Op: "inspect", Dev: f.Name(), Err: err}
	}
	return b, nil
}
