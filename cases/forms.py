from django import forms

from cases.models import BiopsyCase, Patient


class CaseForm(forms.Form):
    patient_mrn = forms.CharField(label="Patient MRN", max_length=64)
    patient_name = forms.CharField(
        label="Patient name", max_length=200, required=False, help_text="Required for a new patient."
    )
    patient_birth_date = forms.DateField(
        label="Date of birth", required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    patient_sex = forms.ChoiceField(label="Sex", choices=Patient.Sex.choices, initial=Patient.Sex.UNKNOWN)
    accession = forms.CharField(max_length=64)
    specimen_site = forms.CharField(max_length=120, help_text="e.g. sigmoid colon")
    priority = forms.ChoiceField(choices=BiopsyCase.Priority.choices, initial=BiopsyCase.Priority.ROUTINE)
    clinical_notes = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False)
