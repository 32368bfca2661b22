package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"reflect"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/cove-oci/cove/internal/cli"
)

// The configuration file (--config FILE) is TOML whose keys are serve's flags with '_'
// for '-': storage_max_size = "500GiB", pin = ["docker.io/library/*:*"]. A flag given on
// the command line wins over the file. An unknown key is an error naming it and its line.

// configKey is the TOML key of a flag.
func configKey(flagName string) string { return strings.ReplaceAll(flagName, "-", "_") }

// applyConfig reads path and sets every flag of fs that the command line did not set.
func applyConfig(fs *flag.FlagSet, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })

	// One field per flag, so that the decoder itself refuses unknown keys with their
	// position (DisallowUnknownFields).
	var fields []reflect.StructField
	var names []string
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name == "config" {
			return
		}
		fields = append(fields, reflect.StructField{
			Name: fmt.Sprintf("F%d", len(fields)),
			Type: reflect.TypeFor[any](),
			Tag:  reflect.StructTag(fmt.Sprintf(`toml:%q`, configKey(f.Name))),
		})
		names = append(names, f.Name)
	})
	v := reflect.New(reflect.StructOf(fields))
	dec := toml.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v.Interface()); err != nil {
		return configError(path, err)
	}
	for i, name := range names {
		val := v.Elem().Field(i).Interface()
		if val == nil || onCommandLine[name] {
			continue
		}
		f := fs.Lookup(name)
		values, err := configValues(f, val)
		if err != nil {
			return fmt.Errorf("%s: %s: %v", path, configKey(name), err)
		}
		for _, s := range values {
			if err := f.Value.Set(s); err != nil {
				return fmt.Errorf("%s: %s = %q: %v", path, configKey(name), s, err)
			}
		}
	}
	return nil
}

// configValues turns a TOML value into the flag's string values: a list for a
// repeatable flag (a single string is taken as a list of one), a scalar otherwise.
func configValues(f *flag.Flag, val any) ([]string, error) {
	_, repeated := f.Value.(*cli.Repeated)
	if list, ok := val.([]any); ok {
		if !repeated {
			return nil, errors.New("a list is only for repeatable keys")
		}
		out := make([]string, 0, len(list))
		for _, item := range list {
			s, ok := item.(string)
			if !ok {
				return nil, fmt.Errorf("want a list of strings, got %v", item)
			}
			out = append(out, s)
		}
		return out, nil
	}
	switch x := val.(type) {
	case string:
		return []string{x}, nil
	case int64, float64, bool:
		if repeated {
			return nil, errors.New("want a list of strings")
		}
		return []string{fmt.Sprint(x)}, nil
	}
	return nil, fmt.Errorf("unsupported value %v", val)
}

// configError names the file, the line and the key of a decoding error.
func configError(path string, err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) && len(strict.Errors) > 0 {
		e := strict.Errors[0]
		row, _ := e.Position()
		return fmt.Errorf("%s:%d: unknown key %q", path, row, strings.Join(e.Key(), "."))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return fmt.Errorf("%s:%d:%d: %v", path, row, col, de)
	}
	return fmt.Errorf("%s: %v", path, err)
}
